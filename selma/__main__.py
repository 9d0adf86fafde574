import sys

from selma.cli import main

sys.exit(main())
