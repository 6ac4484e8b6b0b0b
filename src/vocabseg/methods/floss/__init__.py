"""FLOSS: the plug-in (:mod:`.recipe`), its template rankings and ranking stage (:mod:`.rankings`), its command
(:mod:`.cli`)."""

from vocabseg.methods.floss.method import FLOSS, expert_fusion, query_templates
from vocabseg.methods.floss.rankings import TemplateRankings, official_rankings, rank_templates

__all__ = ["FLOSS", "TemplateRankings", "expert_fusion", "official_rankings", "query_templates", "rank_templates"]
