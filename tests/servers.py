"""Real servers for the tests: the product's own launcher (tasks/runtime/servers.py), which `dpa up` uses too."""

from tasks.runtime.servers import HOST, Server, free_port, running_server, start_server

__all__ = ["HOST", "Server", "free_port", "running_server", "start_server"]
