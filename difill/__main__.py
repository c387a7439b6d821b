import sys

from difill.cli import main

sys.exit(main())
