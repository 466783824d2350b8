import sys

from smolora_mlflow.serving.launcher import main

sys.exit(main())
