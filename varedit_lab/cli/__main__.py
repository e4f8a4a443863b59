import sys

from varedit_lab.cli import main

sys.exit(main())
