import sys

from vitaserve.cli.main import main

sys.exit(main())
