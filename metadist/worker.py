"""``python -m metadist.worker CONFIG [key=value ...] [--run-dir DIR] [--pretrain]``: one
process, or one rank under ``torchrun``, with no Ray (``metadist.runners.local``)."""

from metadist.runners.local import main
from metadist.training.signals import sigterm_unwinds

__all__ = ["main"]

if __name__ == "__main__":
    with sigterm_unwinds():
        main()
