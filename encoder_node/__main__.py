import sys

from encoder_node.main import main

sys.exit(main())
