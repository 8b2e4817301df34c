"""mltk modules (bwLehrpool's Stage4 customisations) run the Stage4 way.

An mltk module is a folder with `module.conf` (bash: `REQUIRED_*` variables), optional
`module.conf.<distro>` files, `module.build` (the functions `fetch_source`, `build`, `post_copy`) and a
`data/` tree. stage4 runs them in its own layers: in dev the build packages are installed and
`fetch_source` and `build` run, and what `REQUIRED_BINARIES`, `_LIBRARIES`, `_DIRECTORIES` and `_FILES`
name is collected from the module's build tree; in prod the content packages are installed as packages,
`data/` and the collected files are copied in and `post_copy` runs.

modules.py finds the modules and reads their config (with bash) on the host and puts them in dependency
order; plan.py fetches the sources and makes what the Ansible roles get; driver.sh runs a module's
functions inside the layer with the environment and helpers mltk gives them.
"""
