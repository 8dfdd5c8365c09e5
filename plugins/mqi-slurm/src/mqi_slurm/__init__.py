"""mqi-slurm: run beams as Slurm batch jobs.

* :mod:`mqi_slurm.plugin` – the entry point (registers the ``slurm`` executor);
* :mod:`mqi_slurm.executor` – :class:`SlurmExecutor`: job scripts, sbatch, re-attach, scancel;
* :mod:`mqi_slurm.states` – parsing ``sbatch``/``squeue``/``sacct`` output and mapping Slurm
  job states to the host's job states;
* :mod:`mqi_slurm.site` – where the Slurm commands and job files live: this machine, or a
  login node over the SSH connection of mqi-ssh.
"""

__version__ = "0.1.0"
