"""FLOSS: the plug-in (:mod:`.method`), its template rankings and ranking stage (:mod:`.rankings`), its command
``floss-rank`` (:mod:`.commands`)."""
