"""One module per `--mode` of `python -m jaxdiff.main`, each with `run(config, workdir)`; nothing outside this
package imports it (main.py looks modes up by name)."""
