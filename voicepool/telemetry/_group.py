"""The OpenTelemetry observer of a :class:`~voicepool.PoolGroup`: switch counters, the failover
span event on the caller's span, and the group wait histogram by serving member."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from voicepool.group import GroupObserver
from voicepool.telemetry import names as n

if TYPE_CHECKING:
    from voicepool.group import PoolGroup
    from voicepool.telemetry._instruments import Instruments, PoolRegistry

log = logging.getLogger("voicepool.telemetry")

# One instrumentation adds a group's span events (as for pools: two instrumentations must not put
# the same event twice on the caller's span); the first active one owns them.
_event_owner: weakref.WeakKeyDictionary[PoolGroup[Any], OtelGroupObserver] = (
    weakref.WeakKeyDictionary()
)


class OtelGroupObserver(GroupObserver):
    """Hooks of one group; each is guarded (telemetry never breaks an acquire)."""

    def __init__(self, group: PoolGroup[Any], instruments: Instruments, registry: PoolRegistry):
        self._name = group.name
        self._m = instruments
        self._registry = registry
        self._failed = False
        _event_owner.setdefault(group, self)

    def _owns_events(self, group: PoolGroup[Any]) -> bool:
        owner = _event_owner.get(group)
        if owner is self:
            return True
        if owner is None or not owner._registry.active:  # the owner was removed: take over
            _event_owner[group] = self
            return True
        return False

    def _attrs(self, old: str, new: str, why: str) -> dict[str, AttributeValue]:
        return {
            n.ATTR_GROUP_NAME: self._name,
            n.ATTR_GROUP_FROM: old,
            n.ATTR_GROUP_TO: new,
            n.ATTR_GROUP_WHY: why,
        }

    def _report(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.warning("group %s: telemetry hook failed (reported once): %r", self._name, exc)

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        if not self._registry.active:
            return
        try:
            counter = self._m.group_failbacks if back else self._m.group_failovers
            counter.add(1, self._attrs(old, new, why))
        except Exception as exc:
            self._report(exc)

    def on_switch_served(self, group: PoolGroup[Any], old: str, new: str, why: str) -> None:
        if not self._registry.active:
            return
        try:
            span = trace.get_current_span()
            if span.is_recording() and self._owns_events(group):
                span.add_event(n.EVENT_FAILOVER, self._attrs(old, new, why))
        except Exception as exc:
            self._report(exc)

    def on_served(self, group: PoolGroup[Any], member: str, waited: float) -> None:
        if not self._registry.active:
            return
        try:
            self._m.group_wait_time.record(
                waited, {n.ATTR_GROUP_NAME: self._name, n.ATTR_GROUP_MEMBER: member}
            )
        except Exception as exc:
            self._report(exc)
