"""The accelerate trainers (tokenizer, prior), the dataset encoder, and what they share.

This package file imports nothing heavy: `TrainingStopped` is here so that the command line can
recognise it without loading accelerate.
"""


class TrainingStopped(RuntimeError):
    """A run that cannot usefully go on (NaN steps in a row, no readable images): the message says
    what happened and what to do; the newest complete checkpoint is intact."""
