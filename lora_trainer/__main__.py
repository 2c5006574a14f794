"""`python -m lora_trainer <command>`: create / train / classimages / merge / ui / demo."""
import sys

from .cli import main

sys.exit(main())
