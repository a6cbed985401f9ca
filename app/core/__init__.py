"""The lookup core: pure logic with no sockets, no threads of its own and no real clock."""
