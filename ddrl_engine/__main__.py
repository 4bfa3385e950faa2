import sys

from ddrl_engine.cli import main

sys.exit(main())
