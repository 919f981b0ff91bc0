"""Research code that runs from the repository root and is not installed (`python -m experiments.<...>`)."""
