import sys

from voicepool.cli import main

sys.exit(main())
