import sys

from archive_vision.cli import main

sys.exit(main())
