"""One call: the session on its socket, its turns, its memory and its record."""
