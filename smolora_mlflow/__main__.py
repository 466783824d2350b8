import sys

from smolora_mlflow.cli import main

sys.exit(main())
