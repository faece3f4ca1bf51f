"""PaymentsService.usage: a payer's settled requests from the ledger (the dashboard's "my usage"), newest
first, and nothing of another payer's."""

from solders.keypair import Keypair

from tests.fakes.payments import LocalPaymentsClient
from tests.unit.payments.conftest import funded_client, run, serve_request


def test_usage_lists_the_payers_own_settlements_newest_first(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    a, b, provider = funded_client(service, 1_000_000), funded_client(service, 1_000_000), Keypair()
    first = serve_request(service, "ra1", str(a.pubkey()), [(str(provider.pubkey()), 30)])
    serve_request(service, "rb1", str(b.pubkey()), [(str(provider.pubkey()), 30)])
    second = serve_request(service, "ra2", str(a.pubkey()), [(str(provider.pubkey()), 30)])
    lines = run(LocalPaymentsClient(service).usage(str(a.pubkey())))
    assert [line.request_id for line in lines] == ["ra2", "ra1"]
    assert {line.settlement_id for line in lines} == {first.settlement_id, second.settlement_id}
    assert lines[0].cost == second.cost > 0 and lines[0].prompt_tokens == second.prompt_tokens
    assert run(LocalPaymentsClient(service).usage(str(provider.pubkey()))) == []  # a payee paid nothing
