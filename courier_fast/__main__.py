import sys

from courier_fast.cli import main

sys.exit(main())
