import sys

from vla_foundry.cli import main

sys.exit(main())
