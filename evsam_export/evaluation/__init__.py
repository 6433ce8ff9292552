"""Task accuracy against the user's ground truth (`evsam-export evaluate`): the paper's zero-shot protocol."""
