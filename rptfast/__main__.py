import sys

from rptfast.cli import main

sys.exit(main())
