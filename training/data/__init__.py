"""Data: text into training examples (windows, instructions, preference pairs, labels, tasks, rewards) and batches."""
