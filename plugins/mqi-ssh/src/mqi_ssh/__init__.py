"""mqi-ssh: the GPU server as a real remote host, over SSH (paramiko).

* :mod:`mqi_ssh.plugin` – the entry point (registers the ``ssh`` executor);
* :mod:`mqi_ssh.settings` – :class:`SshHostSettings`, one named host (address, user, key,
  known_hosts, jump host, remote root, limits);
* :mod:`mqi_ssh.connection` – one shared connection per host: commands, SFTP sessions,
  channel and connection-rate limits;
* :mod:`mqi_ssh.handshake` – key exchange, the host-key check, authentication;
* :mod:`mqi_ssh.errors` – :class:`~mqi_ssh.errors.SshError` and its kinds;
* :mod:`mqi_ssh.remote` – the POSIX shell scripts that run a job detached on the host;
* :mod:`mqi_ssh.executor` – :class:`SshExecutor`: start, re-attach, poll, kill, logs;
* :mod:`mqi_ssh.testing` – a real ``sshd`` on a loopback port for tests (pytest plugin).
"""

__version__ = "0.1.0"
