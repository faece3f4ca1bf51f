"""The web dashboard the gateway serves at /dashboard: live figures (SSE), network, money, training, a
client's own view, operator actions. Server-rendered Jinja2 templates with htmx; see docs/dashboard.md."""
