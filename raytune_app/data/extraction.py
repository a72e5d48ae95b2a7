"""The quickstart task: support messages about orders, to be turned into JSON with a fixed schema.

    python -m raytune_app.data.extraction --rows 1200 --seed 0 --out orders.jsonl

Each generated row is {"id", "message", "extraction", "style"}: `message` is what a customer wrote,
`extraction` the JSON string a model should answer with (valid against `SCHEMA`), `style` the
writing style (usable as a group column in evaluation). The messages vary in register (email,
chat, formal, terse), order of facts, wording of quantities ("2", "two", "a pair of"), date formats,
and carry distractors a copying model gets wrong: the date the order was *placed* next to the date
it is *wanted*, other numbers (phone numbers, old ticket numbers), and a second order id that is not
the one in question. Optional facts (email, order id, wanted date) are often absent and must be null.

Pure Python and seeded: the same seed gives the same rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

ISSUES = [
    "late_delivery",
    "damaged_item",
    "wrong_item",
    "missing_item",
    "refund_request",
    "address_change",
    "cancel_order",
]
PRIORITIES = ["low", "normal", "high", "urgent"]

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "order_ticket",
    "type": "object",
    "additionalProperties": False,
    "required": ["order_id", "customer", "items", "issue", "priority", "requested_date"],
    "properties": {
        "order_id": {"type": ["string", "null"], "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "email"],
            "properties": {"name": {"type": "string", "minLength": 1}, "email": {"type": ["string", "null"]}},
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["product", "quantity"],
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
            },
        },
        "issue": {"enum": ISSUES},
        "priority": {"enum": PRIORITIES},
        "requested_date": {"type": ["string", "null"], "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    },
}

INSTRUCTION = (
    "Extract the order details from the customer's message. Reply with one JSON object and nothing else, "
    'with exactly these keys: "order_id" (like "ORD-123456", or null), "customer" ({"name", "email" or null}), '
    '"items" (list of {"product", "quantity"}), "issue" (one of ' + ", ".join(ISSUES) + '), "priority" '
    '(one of low, normal, high, urgent), "requested_date" (YYYY-MM-DD the customer wants something by, or null).'
)

FIRST = [
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Olga",
    "Tom",
    "Priya",
    "Lucas",
    "Fatima",
    "Kenji",
    "Sofia",
    "Daniel",
    "Amara",
    "Mateo",
    "Ingrid",
    "Ravi",
    "Zoe",
    "Omar",
    "Hannah",
    "Yuki",
    "Pedro",
    "Elena",
    "Samuel",
    "Nadia",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Wei",
    "Petrova",
    "Becker",
    "Sharma",
    "Martin",
    "Haddad",
    "Tanaka",
    "Rossi",
    "Okafor",
    "Nguyen",
    "Larsen",
    "Silva",
    "Kowalski",
    "Dubois",
    "Moreau",
    "Jensen",
    "Costa",
    "Ahmed",
    "Park",
]
PRODUCTS = [
    "USB-C cable",
    "wireless earbuds",
    "laptop stand",
    "mechanical keyboard",
    "4K monitor",
    "phone case",
    "desk lamp",
    "coffee grinder",
    "yoga mat",
    "water bottle",
    "running shoes",
    "backpack",
    "webcam",
    "HDMI adapter",
    "office chair",
    "electric kettle",
    "bluetooth speaker",
    "wall charger",
    "mouse pad",
    "air purifier",
    "smart plug",
    "notebook set",
    "travel pillow",
    "blender",
]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 10: "ten", 12: "twelve"}
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

ISSUE_PHRASES = {
    "late_delivery": [
        "my order still hasn't arrived",
        "the package is over a week late",
        "the delivery never showed up",
        "tracking has said 'in transit' for ages",
    ],
    "damaged_item": [
        "it arrived damaged",
        "the box was crushed and the item is broken",
        "one of them came cracked",
        "it was smashed when I opened it",
    ],
    "wrong_item": [
        "you sent the wrong item",
        "I received something I didn't order",
        "the item in the box is not what I bought",
        "the colour and model are wrong",
    ],
    "missing_item": [
        "part of my order is missing",
        "one item was not in the parcel",
        "the box only had half of what I paid for",
        "something is missing from the delivery",
    ],
    "refund_request": ["I'd like a refund", "please refund me", "I want my money back", "can I get a refund for this"],
    "address_change": [
        "I need to change the delivery address",
        "please ship it to my new address instead",
        "I moved and need the address updated",
        "can you redirect the parcel to my office",
    ],
    "cancel_order": [
        "please cancel my order",
        "I want to cancel this order",
        "I no longer need it, cancel please",
        "cancel the order before it ships",
    ],
}
PRIORITY_CUES = {
    "low": ["no rush on this", "whenever you get a chance", "not urgent at all", "take your time"],
    "normal": [""],
    "high": ["I'd appreciate a quick answer", "please look at this soon", "this is quite important to me"],
    "urgent": [
        "this is URGENT",
        "I need this sorted ASAP",
        "urgent please, it's for an event",
        "please treat this as urgent",
    ],
}


def _date_text(rng: random.Random, day: dt.date) -> str:
    style = rng.randrange(5)
    if style == 0:
        return day.isoformat()
    if style == 1:
        return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
    if style == 2:
        return f"{day.day} {MONTHS[day.month - 1][:3]} {day.year}"
    if style == 3:
        return f"{day.day:02d}/{day.month:02d}/{day.year} (dd/mm/yyyy)"
    suffix = "th" if 10 <= day.day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day.day % 10, "th")
    return f"the {day.day}{suffix} of {MONTHS[day.month - 1]} {day.year}"


def _quantity_text(rng: random.Random, quantity: int, product: str) -> str:
    plural = product if quantity == 1 or product.endswith("s") else product + "s"
    if quantity == 1:
        return rng.choice([f"a {product}", f"one {product}", f"1 x {product}", f"the {product}"])
    if quantity == 2 and rng.random() < 0.2:
        return f"a pair of {plural}"
    if quantity in NUMBER_WORDS and rng.random() < 0.5:
        return f"{NUMBER_WORDS[quantity]} {plural}"
    return rng.choice([f"{quantity} {plural}", f"{quantity} x {product}", f"{quantity}x {product}"])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_example(rng: random.Random, index: int) -> dict:
    """One message and its gold extraction."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    email = None
    if rng.random() < 0.6:  # drawn before the domain, as it always was: the seeded data must not change
        domain = rng.choice(["example.com", "mail.test", "inbox.example"])
        email = f"{name.split()[0].lower()}.{name.split()[1].lower()}@{domain}"
    order_id = f"ORD-{rng.randrange(100000, 1000000)}" if rng.random() < 0.8 else None
    items: list[dict] = [
        {"product": p, "quantity": rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6, 10, 12])}
        for p in rng.sample(PRODUCTS, rng.choice([1, 1, 1, 2, 2, 3]))
    ]
    issue = rng.choice(ISSUES)
    priority = rng.choices(PRIORITIES, weights=[2, 4, 2, 2])[0]
    placed = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(0, 300))
    wanted = placed + dt.timedelta(days=rng.randrange(5, 40)) if rng.random() < 0.5 else None

    facts = []
    what = _join([_quantity_text(rng, it["quantity"], it["product"]) for it in items])
    facts.append(
        rng.choice(
            [
                f"I ordered {what}",
                f"My order was for {what}",
                f"I bought {what} from you",
                f"The order contained {what}",
            ]
        )
        + (f" on {_date_text(rng, placed)}" if rng.random() < 0.5 else "")
        + "."
    )
    if order_id:
        facts.append(
            rng.choice(
                [f"Order number is {order_id}.", f"Ref: {order_id}.", f"(order {order_id})", f"It's order {order_id}."]
            )
        )
    if rng.random() < 0.2:  # a second, irrelevant order id: the extraction must not take it
        other = f"ORD-{rng.randrange(100000, 1000000)}"
        facts.append(f"My earlier order {other} was fine, by the way.")
    facts.append(rng.choice(ISSUE_PHRASES[issue]).capitalize() + ".")
    if wanted:
        facts.append(
            rng.choice(
                [
                    f"I need it sorted by {_date_text(rng, wanted)}.",
                    f"Please resolve this before {_date_text(rng, wanted)}.",
                    f"It has to be done by {_date_text(rng, wanted)} at the latest.",
                ]
            )
        )
    cue = rng.choice(PRIORITY_CUES[priority])
    if cue:
        facts.append(cue[0].upper() + cue[1:] + ".")
    if rng.random() < 0.25:
        facts.append(
            rng.choice(
                [
                    f"You can call me on 0{rng.randrange(7000000000, 7999999999)}.",
                    f"This is about ticket #{rng.randrange(10000, 99999)} which nobody answered.",
                    f"I've been a customer for {rng.randrange(2, 12)} years.",
                ]
            )
        )
    body_facts = facts[:1] + rng.sample(facts[1:], len(facts) - 1)

    style = rng.choice(["email", "chat", "formal", "terse"])
    contact = f" ({email})" if email and rng.random() < 0.5 else ""
    if style == "email":
        text = f"Hi there,\n\n{' '.join(body_facts)}\n\nThanks,\n{name}" + (
            f"\n{email}" if email and not contact else contact
        )
    elif style == "chat":
        text = f"{rng.choice(['hey', 'hi', 'hello'])}, {name} here{contact}. " + " ".join(
            f[0].lower() + f[1:] for f in body_facts
        )
    elif style == "formal":
        text = (
            f"Dear Customer Service,\n\nMy name is {name}{contact}. {' '.join(body_facts)}\n\nKind regards,\n{name}"
            + (f"\nEmail: {email}" if email and not contact else "")
        )
    else:
        text = f"{name}{contact or (' - ' + email if email else '')}: " + " ".join(body_facts)
    if email and style == "chat" and not contact:
        email = None  # the chat style only mentions an email inline; without it there is none to extract
    gold = {
        "order_id": order_id,
        "customer": {"name": name, "email": email},
        "items": items,
        "issue": issue,
        "priority": priority,
        "requested_date": wanted.isoformat() if wanted else None,
    }
    return {
        "id": f"ticket-{index:06d}",
        "message": text,
        "extraction": json.dumps(gold, ensure_ascii=False),
        "style": style,
    }


def generate(rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, i) for i in range(rows)]


# How a rejected answer of `preference_pairs` goes wrong: the failure modes small models show on this
# task (NOTES.md: prose after the object, repeated keys; evaluation: wrong values, dropped fields).
FLAWS = ("prose_after", "wrong_value", "missing_key", "prose_reply", "repeated_key")


def _flawed(rng: random.Random, example: dict) -> str:
    gold = json.loads(example["extraction"])
    flaw = rng.choice(FLAWS)
    if flaw == "prose_after":
        return example["extraction"] + rng.choice(
            [
                "\n\nLet me know if you need anything else!",
                " I hope this helps resolve the issue quickly.",
                "\n\nNote: the priority was inferred from the tone of the message.",
            ]
        )
    if flaw == "wrong_value":
        field = rng.choice(["priority", "issue", "quantity"])
        if field == "priority":
            gold["priority"] = rng.choice([p for p in PRIORITIES if p != gold["priority"]])
        elif field == "issue":
            gold["issue"] = rng.choice([i for i in ISSUES if i != gold["issue"]])
        else:
            gold["items"][0]["quantity"] += rng.choice([1, 2, 10])
        return json.dumps(gold, ensure_ascii=False)
    if flaw == "missing_key":
        del gold[rng.choice(["requested_date", "order_id", "priority"])]
        return json.dumps(gold, ensure_ascii=False)
    if flaw == "prose_reply":
        return (
            f"Dear {gold['customer']['name']}, thank you for contacting us. We are sorry to hear about the problem "
            "with your order and will look into it as soon as possible."
        )
    body = json.dumps(gold, ensure_ascii=False)
    return body[:-1] + f', "issue": {json.dumps(rng.choice(ISSUES))}' + "}"  # a key written twice


def preference_pairs(rows: int, seed: int = 0) -> list[dict]:
    """The same messages with a preference pair each: `extraction` (the gold JSON, preferred) and
    `rejected` (a flawed answer, one of FLAWS)."""
    rng = random.Random(seed + 1)
    return [example | {"rejected": _flawed(rng, example)} for example in generate(rows, seed)]


def write_jsonl(path: str | Path, rows: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in generate(rows, seed):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write_jsonl(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
