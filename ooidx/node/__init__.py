"""The node: the twistd plugin, the daemon and its child processes, logs, metrics, the operator token."""
