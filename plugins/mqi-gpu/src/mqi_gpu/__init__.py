"""mqi-gpu: GPUs for the MQI host, as nvidia-smi sees them.

* :mod:`mqi_gpu.plugin` – the entry point (registers the ``nvidia-smi`` curator);
* :mod:`mqi_gpu.nvidia_smi` – parsing of ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``;
* :mod:`mqi_gpu.curator` – :class:`NvidiaSmiCurator`: reads every configured host on an
  interval, judges health and eligibility;
* :mod:`mqi_gpu.runner` – running the command locally or over the SSH connection of mqi-ssh.

Importing :mod:`mqi_gpu.plugin` is cheap: APScheduler and mqi-ssh load only when used.
"""

__version__ = "0.1.0"
