"""Where profiles are kept: in this process, and in Redis when it is configured."""
