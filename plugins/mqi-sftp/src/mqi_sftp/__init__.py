"""mqi-sftp: the ``sftp`` transfer over the shared SSH connection of mqi-ssh.

* :mod:`mqi_sftp.plugin` – the entry point (registers the ``sftp`` transfer);
* :mod:`mqi_sftp.transfer` – :class:`SftpTransfer`: verified, resumable, parallel uploads
  and downloads.
"""

__version__ = "0.1.0"
