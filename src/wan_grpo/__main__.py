
from wan_grpo.cli import program

program()
