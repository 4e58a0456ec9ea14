import sys

from afina.cli import main

sys.exit(main())
