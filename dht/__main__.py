import sys

from dht.tools.cli import main

sys.exit(main())
