import sys

from threetowers.cli import main

sys.exit(main())
