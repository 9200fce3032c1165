import sys

from patchrec.cli import main

sys.exit(main())
