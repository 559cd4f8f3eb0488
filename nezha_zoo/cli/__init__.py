"""Programs, outside the framework-free core: the ``nezha-zoo`` command (:mod:`nezha_zoo.cli.main`)
and the demo (:mod:`nezha_zoo.cli.demo`, ``make demo``), which load the backends they run."""
