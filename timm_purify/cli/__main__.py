"""``python -m timm_purify.cli`` runs the ``timm-purify`` command."""

from . import main

main()
