"""The honest paid path the attacks start from: sign in, deposit, answer, charge, receipt."""

import httpx

from tests.integration.attacks.conftest import MODEL, PaidApp


def test_a_signed_in_funded_wallet_is_charged_what_it_used(paid: PaidApp) -> None:
    wallet = paid.wallet()
    before = paid.balance(wallet)
    answer = paid.client(wallet).completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    after = paid.balance(wallet)
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert after["held"] == 0
    charged = before["available"] - after["available"]
    assert charged == answer.usage.prompt_tokens * 1_000 + 5 * 2_000
    unauthenticated = httpx.post(paid.base_url + "/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"]
