import sys

from decoder_node.main import main

sys.exit(main())
