"""Publishing images into a DNBD3 image store (`stage4 export`, `revisions`, `prune`).

publish.py    the API: `prepare` checks every input, `Export.run` / `publish` do the export
job.py        what an export publishes (Job) and what it published (Publication)
manifest.py   the build manifest beside the image; the dracut modules of an initramfs
local.py      the transaction into a store on this host
remote.py     the same over SSH; remote_commit.sh is the store host's side
records.py    config fragment, iPXE entry and JSON record of a revision
revisions.py  complete and incomplete revisions, repair, prune
tempfiles.py  hidden temporaries, exclusive links, directories made on the way
reload.py     SIGHUP to the server's pid file
"""
