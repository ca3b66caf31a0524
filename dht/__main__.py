import sys

from dht.cli import main

sys.exit(main())
