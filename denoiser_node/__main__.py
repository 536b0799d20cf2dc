import sys

from denoiser_node.main import main

sys.exit(main())
