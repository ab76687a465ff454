"""`VoicePoolSettings`: every pool of a worker configured in one place (pydantic-settings).

Sources, highest precedence first (a higher source wins key by key; tables are merged deeply, so
``VOICEPOOL_POOLS__ASR__MAX_SIZE=8`` overrides one value of a pool the TOML file defines)::

    1. arguments to VoicePoolSettings(...)
    2. environment variables   VOICEPOOL_ prefix, "__" between levels, case-insensitive
    3. the .env file           same names (path: model_config["env_file"], or _env_file=...)
    4. secrets_dir files       only if configured (Docker / Kubernetes secrets)
    5. the TOML file           config=... argument, else VOICEPOOL_CONFIG (environment or .env)
    6. defaults                the field defaults below and in PoolSettings

The file layout (see config/voicepool.example.toml)::

    [defaults]                  # any PoolSettings field, applied to every pool that does not set it
    ping_interval = 20

    [pools.asr]                 # pool names: lowercase letters, digits and "_" (env vars are
    adapter = "deepgram"        #   case-insensitive); adapter: a registered adapter name
    required = true             # boot policy: true fails the boot, false starts degraded
    concurrency = 20            # PoolSettings fields, flat in the pool's table
    [pools.asr.options]         # the adapter's own options, validated by its Options model
    api_key = "..."             # credentials are SecretStr in the adapter's model

    [groups.asr_any]            # a PoolGroup (failover, regions): see voicepool.group
    members = ["asr", "asr_eu"] # pools of the same adapter, each in at most one group
    policy = "priority"         # or "lowest_rtt"
    standby_min = 1             # warm connections each standby keeps at least
    standby = "adaptive"        # standby floor follows the traffic ("fixed": standby_min)
    failback_after = 30         # seconds an earlier member stays READY before it serves again

Errors: constructing :class:`VoicePoolSettings` raises :class:`~voicepool.ConfigError` (a
``ValueError``) whose message lists every problem as ``path: reason``, e.g.
``pools.asr.max_size: Input should be greater than or equal to 1 (got -1)``. The pydantic
``ValidationError`` is deliberately not chained (its text would echo inputs, credentials included).
The building blocks (:class:`PoolConfig`, ``VoicePoolSettings.model_validate``) are plain pydantic
models and raise ``ValidationError`` with the same full paths in ``loc``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, cast, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
)
from pydantic import model_validator as _model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from voicepool._redact import SECRET_KEY, Redacted, redact, remember, scrub, secret_values
from voicepool._validation import format_errors, plain_message
from voicepool.adapter import get_adapter, registered_adapters
from voicepool.errors import AdapterNotFound, ConfigError
from voicepool.group import GroupPolicy, compatible
from voicepool.pool_settings import MAX_POOL_SIZE, MAX_SECONDS, PoolSettings

if TYPE_CHECKING:
    from voicepool.adapter import Adapter

__all__ = [
    "CONFIG_ENV",
    "NO_SECRET",
    "GroupConfig",
    "OptionalSecret",
    "PoolConfig",
    "Secret",
    "VoicePoolSettings",
    "secret_values",
]

CONFIG_ENV = "VOICEPOOL_CONFIG"
"""Environment variable naming the TOML file (also read from the .env file)."""

# -- credential fields -----------------------------------------------------------------------------
# A credential is stored as a SecretStr but given as a plain str too (from code as from the
# environment). Type checkers learn both from a descriptor: its __set__ takes what the model's
# __init__ accepts, its __get__ gives what the attribute holds, so a user's
# `RestOptions(api_key="sk-...")` passes `mypy --strict` without the pydantic plugin, and
# `options.api_key.get_secret_value()` is typed. At run time the annotation is plain SecretStr.
if TYPE_CHECKING:

    class Secret:
        """A required credential field: accepts ``str`` or ``SecretStr``, holds ``SecretStr``."""

        @overload
        def __get__(self, obj: None, owner: Any) -> Secret: ...
        @overload
        def __get__(self, obj: object, owner: Any) -> SecretStr: ...
        def __get__(self, obj: object, owner: Any) -> SecretStr | Secret: ...
        def __set__(self, obj: object, value: SecretStr | str) -> None: ...

    class OptionalSecret:
        """An optional credential field: ``str``, ``SecretStr`` or None; holds SecretStr | None."""

        @overload
        def __get__(self, obj: None, owner: Any) -> OptionalSecret: ...
        @overload
        def __get__(self, obj: object, owner: Any) -> SecretStr | None: ...
        def __get__(self, obj: object, owner: Any) -> SecretStr | OptionalSecret | None: ...
        def __set__(self, obj: object, value: SecretStr | str | None) -> None: ...

else:
    Secret = SecretStr
    OptionalSecret = Optional[SecretStr]  # noqa: UP045 - a runtime alias, not an annotation

NO_SECRET: Any = None
"""The default of an :data:`OptionalSecret` field: ``Field(default=NO_SECRET)`` (a plain None
would not match the descriptor type the checkers see)."""

_POOL_FIELDS = frozenset(PoolSettings.model_fields)
_ENTRY_KEYS = frozenset({"adapter", "required", "options", "settings"})
_POOL_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_Loc = tuple[int | str, ...]
# The TOML file the current construction reads, so its errors can name it.
_reading: ContextVar[Path | None] = ContextVar("voicepool_settings_file", default=None)


# -- error collection ----------------------------------------------------------------------------


class _Errors:
    """Collects problems with their paths, so one ValidationError reports all of them."""

    def __init__(self) -> None:
        self.items: list[InitErrorDetails] = []

    def add(self, loc: _Loc, kind: str, message: str, value: Any = None) -> None:
        self.items.append(
            InitErrorDetails(
                type=PydanticCustomError(kind, "{reason}", {"reason": message}),
                loc=loc,
                input=value,
            )
        )

    def extend(
        self, exc: ValidationError, prefix: _Loc, *, inputs: bool, hidden: Iterable[str] = ()
    ) -> None:
        """Re-home ``exc``'s errors under ``prefix``; inputs are kept only when ``inputs``;
        ``hidden`` values (and every remembered credential) are masked in the messages."""
        for err in exc.errors(include_url=False):
            message = scrub(plain_message(err["msg"]), hidden)
            if err["type"] == "extra_forbidden" and not inputs:
                message = f"unknown option for this adapter ({message.lower()})"
            self.add((*prefix, *err["loc"]), err["type"], message, err["input"] if inputs else None)

    def raise_if_any(self, title: str) -> None:
        if self.items:
            raise ValidationError.from_exception_data(title, self.items)


# -- one pool ------------------------------------------------------------------------------------


class PoolConfig(BaseModel):
    """One validated pool entry: what :class:`~voicepool.PoolManager` builds a pool from.

    Built from the flat form of a ``[pools.<name>]`` table: ``adapter``, ``required``, the
    :class:`~voicepool.PoolSettings` fields, and ``options`` (a table validated by the adapter's
    ``Options`` model; the validated model is kept, credentials stay ``SecretStr``). A ``settings``
    key (a PoolSettings or a dict) may give the pool settings as one object; flat keys override it.
    Raises pydantic ``ValidationError`` naming the key (``max_size``, ``options.api_key``, ...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: str = Field(description="Registered adapter name (decorator or entry point).")
    required: bool = Field(
        default=True,
        description="Boot policy: a required pool that cannot open one connection fails the boot;"
        " an optional one starts degraded and recovers in the background.",
    )
    options: SerializeAsAny[BaseModel] | None = Field(
        default=None, description="The adapter's validated Options model."
    )
    settings: PoolSettings = Field(default_factory=PoolSettings)

    def __init__(self, **data: Any) -> None:
        """Flat form: ``adapter=``, ``required=``, ``options=``, ``settings=`` and any
        :class:`~voicepool.PoolSettings` field (``max_size=4``). Raises pydantic ValidationError."""
        super().__init__(**data)

    @_model_validator(mode="before")
    @classmethod
    def _from_entry(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return _parse_entry(data, {})
        return data

    @field_serializer("options", mode="wrap")
    def _dump_options(self, value: BaseModel | None, handler: SerializerFunctionWrapHandler) -> Any:
        # SecretStr fields dump masked already; plain strings under credential-looking keys (an
        # adapter that forgot SecretStr, a headers dict) are masked too.
        return redact("options", handler(value))

    @property
    def adapter_class(self) -> type[Adapter[Any]]:
        """The adapter class (raises AdapterNotFound if it was unregistered since validation)."""
        return get_adapter(self.adapter)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        yield "adapter", self.adapter
        yield "required", self.required
        yield "options", None if self.options is None else Redacted(self.options)
        yield "settings", _Changed(self.settings)


def _parse_entry(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one raw pool table into PoolConfig fields; raise a relative ValidationError."""
    errors = _Errors()
    data = {str(k): v for k, v in raw.items()}
    unknown_entry_keys = [k for k in data if k not in _ENTRY_KEYS and k not in _POOL_FIELDS]

    adapter_cls: type[Adapter[Any]] | None = None
    name = data.get("adapter")
    if name is None:
        errors.add(
            ("adapter",),
            "missing",
            "Field required: every pool names its adapter (registered: "
            f"{', '.join(registered_adapters()) or 'none'}); a pool that only an environment"
            " variable mentions is probably a misspelt pool name",
        )
    elif not isinstance(name, str):
        errors.add(("adapter",), "string_type", "Input should be a valid string", name)
    else:
        try:
            adapter_cls = get_adapter(name)
        except AdapterNotFound as exc:
            errors.add(("adapter",), "unknown_adapter", str(exc))
        except Exception as exc:  # an installed adapter that is broken (entry point, import)
            errors.add(
                ("adapter",),
                "unknown_adapter",
                f"adapter {name!r} cannot be loaded: {type(exc).__name__}: {exc}",
            )

    required = data.get("required", True)
    if isinstance(required, str) and required.strip().lower() in {"1", "true", "yes", "on"}:
        required = True
    elif isinstance(required, str) and required.strip().lower() in {"0", "false", "no", "off"}:
        required = False
    if not isinstance(required, bool):
        errors.add(("required",), "bool_type", "Input should be true or false", None)

    # Pool settings: [defaults], then the `settings` object, then the flat keys of this pool.
    base = data.get("settings")
    if isinstance(base, PoolSettings):
        base = base.model_dump(exclude_unset=True)
    elif base is not None and not isinstance(base, Mapping):
        errors.add(("settings",), "model_type", "Input should be a PoolSettings or a table")
        base = None
    merged: dict[str, Any] = dict(defaults)
    merged.update(base or {})
    merged.update({k: v for k, v in data.items() if k in _POOL_FIELDS})
    merged.update({k: data[k] for k in unknown_entry_keys})  # PoolSettings rejects them by name
    settings: PoolSettings | None = None
    try:
        settings = PoolSettings.model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = err["loc"]
            if err["type"] == "extra_forbidden":
                errors.add(
                    loc,
                    "extra_forbidden",
                    "unknown pool setting (adapter options go under `options`; pool settings"
                    " are the PoolSettings fields)",
                )
            else:
                errors.add(loc, err["type"], plain_message(err["msg"]), err["input"])

    options: BaseModel | None = None
    raw_options = data.get("options")
    if adapter_cls is not None:
        model = adapter_cls.Options
        if model is None:
            if raw_options:
                errors.add(("options",), "no_options", f"adapter {name!r} takes no options")
        elif isinstance(raw_options, model):
            options = raw_options
            remember(secret_values(options))
        elif raw_options is None or isinstance(raw_options, Mapping):
            try:
                options = model.model_validate(dict(raw_options or {}))
                remember(secret_values(options))
            except ValidationError as exc:
                hidden = _raw_secrets(model, raw_options or {})
                errors.extend(exc, ("options",), inputs=False, hidden=hidden)
        else:
            errors.add(("options",), "dict_type", "Input should be a table of adapter options")

    errors.raise_if_any("PoolConfig")
    assert settings is not None
    return {"adapter": name, "required": required, "options": options, "settings": settings}


def _raw_secrets(model: type[BaseModel], raw: Mapping[str, Any]) -> list[str]:
    """Raw values of the credential fields of an options table (to scrub from messages)."""
    found: list[str] = []
    for key, value in raw.items():
        field = model.model_fields.get(str(key))
        is_secret = field is not None and "Secret" in repr(field.annotation)
        if isinstance(value, str) and (is_secret or SECRET_KEY.search(str(key))):
            found.append(value)
    return [s for s in found if len(s) >= 4]


# -- one group of pools ---------------------------------------------------------------------------


class GroupConfig(BaseModel):
    """One ``[groups.<name>]`` table: a :class:`~voicepool.PoolGroup` over named pools."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    members: list[str] = Field(
        min_length=1,
        description="Pool names, in priority order (one adapter, or adapters of one service).",
    )
    policy: GroupPolicy = Field(
        default=GroupPolicy.PRIORITY,
        description="Which member serves: in order, or lowest ping RTT.",
    )
    standby_min: int = Field(
        default=1,
        ge=0,
        le=MAX_POOL_SIZE,
        description="Warm, pinged connections each standby keeps at least (with standby ="
        " `fixed`: exactly).",
    )
    standby: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="Standby floor: `adaptive` follows the group's traffic (the warm_target"
        " Poisson quantile of the calls arriving within one of the standby's connects, never"
        " below standby_min); `fixed` keeps standby_min.",
    )
    failback_after: float = Field(
        default=30.0,
        ge=0,
        le=MAX_SECONDS,
        description="Seconds an earlier member stays READY before it serves again.",
    )
    required: bool = Field(
        default=True, description="Boot fails when no member can open a connection."
    )


def _check_groups(
    groups: Mapping[str, GroupConfig], pools: Mapping[str, PoolConfig], errors: _Errors
) -> None:
    """Members exist, share one adapter, belong to one group; group and pool names differ."""
    owner: dict[str, str] = {}
    for name, group in groups.items():
        loc: _Loc = ("groups", name)
        if name in pools:
            errors.add(loc, "group_name", f"a pool is named {name!r} too: names must be unique")
        adapters: dict[str, str] = {}
        for member in group.members:
            if member not in pools:
                known = ", ".join(sorted(pools)) or "none"
                errors.add(
                    (*loc, "members"),
                    "unknown_member",
                    f"no pool named {member!r} (pools: {known})",
                )
                continue
            if member in owner:
                errors.add(
                    (*loc, "members"),
                    "member_taken",
                    f"pool {member!r} is already a member of group {owner[member]!r}"
                    " (a pool belongs to at most one group)",
                )
            owner.setdefault(member, name)
            adapters[member] = pools[member].adapter
        classes = {m: pools[m].adapter_class for m in adapters}
        first = next(iter(classes.values()), None)
        if first is not None and not all(compatible(first, c) for c in classes.values()):
            listed = ", ".join(
                f"{m} ({a}, service {classes[m].service or 'none'})" for m, a in adapters.items()
            )
            errors.add(
                (*loc, "members"),
                "incompatible_members",
                f"members use incompatible adapters: {listed}; a group's members share one"
                " adapter, or adapters of one service",
            )


# -- the whole configuration ---------------------------------------------------------------------


class VoicePoolSettings(BaseSettings):
    """All pools of a worker: ``pools`` maps a pool name to its :class:`PoolConfig`.

    ``VoicePoolSettings()`` reads the environment, ``.env`` and the TOML file named by
    ``VOICEPOOL_CONFIG``; ``VoicePoolSettings(config="voicepool.toml")`` names the file explicitly.
    See the module docstring for precedence. Raises :class:`~voicepool.ConfigError` listing every
    problem with its path; never echoes a credential. Instances are immutable.
    """

    model_config = SettingsConfigDict(
        env_prefix="VOICEPOOL_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    config: Path | None = Field(
        default=None,
        description="The TOML file read (argument, or VOICEPOOL_CONFIG); None: no file.",
    )
    defaults: PoolSettings = Field(
        default_factory=PoolSettings,
        description="PoolSettings values applied to every pool that does not set them.",
    )
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        token = _reading.set(None)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, _reading.get(), echo=_POOL_FIELDS)) from None
        finally:
            _reading.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_path(init_settings, env_settings, dotenv_settings)
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        _reading.set(path)
        if path is not None:
            if not path.is_file():
                raise ConfigError(
                    f"config file {str(path)!r} (from {CONFIG_ENV} or config=) does not exist"
                )
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
            except OSError as exc:
                raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
        return tuple(sources)

    @_model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """Apply [defaults], validate each pool with its adapter, check per-process limits."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        errors = _Errors()
        defaults_set: dict[str, Any] = {}
        raw_defaults = data.get("defaults")
        if raw_defaults is not None:
            try:
                if isinstance(raw_defaults, PoolSettings):
                    defaults = raw_defaults
                else:
                    defaults = PoolSettings.model_validate(raw_defaults)
                data["defaults"] = defaults
                defaults_set = defaults.model_dump(exclude_unset=True)
            except ValidationError as exc:
                errors.extend(exc, ("defaults",), inputs=True)
                data.pop("defaults")

        raw_pools = data.get("pools")
        if isinstance(raw_pools, Mapping):
            pools: dict[str, PoolConfig] = {}
            for name, entry in raw_pools.items():
                loc: _Loc = ("pools", str(name))
                if not _POOL_NAME.match(str(name)):
                    errors.add(
                        loc,
                        "pool_name",
                        "pool names are lowercase letters, digits and '_', starting with a letter"
                        " (environment variables are case-insensitive)",
                    )
                    continue
                try:
                    if isinstance(entry, PoolConfig):
                        entry = {
                            "adapter": entry.adapter,
                            "required": entry.required,
                            "options": entry.options,
                            "settings": entry.settings,
                        }
                    if not isinstance(entry, Mapping):
                        errors.add(loc, "model_type", "Input should be a table (a pool entry)")
                        continue
                    pools[str(name)] = PoolConfig.model_construct(
                        **_parse_entry(entry, defaults_set)
                    )
                except ValidationError as exc:
                    errors.extend(exc, loc, inputs=True)
            _check_process_limits(pools, errors)
            data["pools"] = pools
        raw_groups = data.get("groups")
        if isinstance(raw_groups, Mapping):
            groups: dict[str, GroupConfig] = {}
            for name, entry in raw_groups.items():
                loc = ("groups", str(name))
                if not _POOL_NAME.match(str(name)):
                    errors.add(loc, "group_name", "group names are written like pool names")
                    continue
                try:
                    groups[str(name)] = (
                        entry
                        if isinstance(entry, GroupConfig)
                        else GroupConfig.model_validate(entry)
                    )
                except ValidationError as exc:
                    errors.extend(exc, loc, inputs=True)
            _check_groups(groups, data.get("pools") or {}, errors)
            data["groups"] = groups
        errors.raise_if_any(cls.__name__)
        return data

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        yield "config", self.config
        yield "defaults", _Changed(self.defaults)
        yield "pools", self.pools
        yield "groups", self.groups


def _config_path(*sources: PydanticBaseSettingsSource) -> Path | None:
    """The TOML file: config= argument, else VOICEPOOL_CONFIG from the environment, else .env."""
    init = sources[0]
    explicit = getattr(init, "init_kwargs", {}).get("config")
    if explicit:
        return Path(explicit).expanduser()
    for source in sources[1:]:
        if isinstance(source, EnvSettingsSource):
            value = source.env_vars.get(CONFIG_ENV.lower()) or source.env_vars.get(CONFIG_ENV)
            if value:
                return Path(value).expanduser()
    return None


def _check_process_limits(pools: Mapping[str, PoolConfig], errors: _Errors) -> None:
    """Reject pools that together need more connections than an adapter allows per process."""
    by_adapter: dict[type[Adapter[Any]], list[tuple[str, int]]] = {}
    for name, cfg in pools.items():
        cls = get_adapter(cfg.adapter)
        try:
            # Class attributes stand in for an instance: sizing reads lease_mode / max_streams.
            sizing = cfg.settings.resolve(cast("Adapter[Any]", cls))
        except ValueError as exc:  # the message starts with the field it is about
            field = str(exc).split(" ", 1)[0].rstrip(":")
            errors.add(
                ("pools", name, field if field in _POOL_FIELDS else "min_size"), "sizing", str(exc)
            )
            continue
        if cls.max_connections_per_process is not None:
            by_adapter.setdefault(cls, []).append((name, sizing.max_size))
    for cls, users in by_adapter.items():
        limit = cls.max_connections_per_process
        assert limit is not None
        total = sum(size for _, size in users)
        if total <= limit:
            continue
        parts = " + ".join(f"{size} ({name})" for name, size in users)
        message = (
            f"adapter {pools[users[0][0]].adapter!r} allows at most {limit} connections per"
            f" process, but its pools need max_size {parts} = {total}; lower max_size (or"
            " concurrency / headroom), or run another worker process"
        )
        for name, _ in users:
            errors.add(("pools", name, "max_size"), "process_limit", message)


# -- reprs ---------------------------------------------------------------------------------------


class _Changed:
    """Repr of a PoolSettings showing only the fields that were set."""

    def __init__(self, model: BaseModel) -> None:
        self.model = model

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{key}={getattr(self.model, key)!r}" for key in sorted(self.model.model_fields_set)
        )
        return f"{type(self.model).__name__}({fields})"
