"""mqi-sftp: the ``sftp`` transfer over the shared SSH connection of mqi-ssh.

* :mod:`mqi_sftp.plugin` – the entry point (registers the ``sftp`` transfer);
* :mod:`mqi_sftp.transfer` – :class:`SftpTransfer`: verified, resumable, parallel uploads
  and downloads of whole trees;
* :mod:`mqi_sftp.settings` – :class:`SftpTransferSettings`;
* :mod:`mqi_sftp.streams` – one file over SFTP, resumable, hashed while it streams;
* :mod:`mqi_sftp.verify` – SHA-256 on the host (batched, by segments) and locally;
* :mod:`mqi_sftp.channels` – several SFTP sessions over one file list, progress counts.
"""

__version__ = "0.1.0"
