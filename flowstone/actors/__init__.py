"""Actor plumbing: mailboxes, handles, supervision, and the memory-store actor."""
