"""mqi-moqui: the Moqui interpreter for the MQI host.

* :mod:`mqi_moqui.plugin` – the entry point (registers ``moqui`` and the ``demo`` command);
* :mod:`mqi_moqui.interpreter` – :class:`MoquiInterpreter`: RT Ion Plan → beams → ``moqui_tps_<n>.in``;
* :mod:`mqi_moqui.samples` – sample case folders (``mqi-sample-case``);
* :mod:`mqi_moqui.standin` – a stand-in for Moqui's ``tps_env`` (``mqi-standin-tps``);
* :mod:`mqi_moqui.postprocess` – dose check and summary of one downloaded beam.

Importing this package is cheap: pydicom is imported only when a plan is read or written.
"""

__version__ = "0.1.0"
