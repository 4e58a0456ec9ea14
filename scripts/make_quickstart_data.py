#!/usr/bin/env python3
"""Generate the afina quickstart dataset.

Support Q&A for a FICTIONAL company (Quorlan Kettleworks, a maker of smart
kettles). None of these facts exist anywhere, so a pretrained model cannot
know them and fine-tuning measurably teaches them.

Writes src/afina/recipes/data/quickstart_support.jsonl:
40 facts x 6 paraphrased questions = 240 rows, in fact order.
Stdlib only, fully deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPANY = "Quorlan Kettleworks"
SYSTEM = f"You are the customer support assistant for {COMPANY}. Answer briefly and precisely."

# Each fact: (canonical answer, must_include keys, six user questions).
FACTS: list[tuple[str, list[str], list[str]]] = [
    (  # f01 support hours
        "Support is open Tuesday to Saturday, 7:40 a.m. to 3:20 p.m. Central Time.",
        ["7:40 a.m.", "3:20 p.m."],
        [
            "What are your support hours?",
            "when can i reach support?",
            "Could you please tell me during which hours your customer support team is available?",
            "I tried calling on a Monday and nobody answered. When are you actually open?",
            "support hours",
            "Is your help desk open on weekends, and at what times?",
        ],
    ),
    (  # f02 phone number
        "You can call our support line at 1-888-555-0147.",
        ["1-888-555-0147"],
        [
            "What is your customer support phone number?",
            "got a number i can call?",
            "Kindly provide the telephone number for your support line.",
            "My kettle stopped heating and I'd rather talk to someone. What number do I dial?",
            "support phone number",
            "How do I reach you by phone?",
        ],
    ),
    (  # f03 support e-mail
        "Our support email is care@quorlan-kettleworks.example.",
        ["care@quorlan-kettleworks.example"],
        [
            "What's your support email address?",
            "can i email you guys?",
            "To which email address should I direct written support enquiries?",
            "I have photos of a damaged kettle to send you. Where should I email them?",
            "support email",
            "Is there an address I can write to for help by email?",
        ],
    ),
    (  # f04 return window
        "You can return any kettle within 47 days of delivery for a full refund.",
        ["47 days"],
        [
            "How long do I have to return a kettle?",
            "whats the return window?",
            "Could you state the period within which a purchase may be returned for a refund?",
            "I bought an Ember kettle five weeks ago and I don't like it. Can I still return it?",
            "return period",
            "How many days after delivery can I send a kettle back?",
        ],
    ),
    (  # f05 warranty length
        "Every Quorlan kettle comes with a 29-month limited warranty.",
        ["29-month"],
        [
            "How long is the warranty on your kettles?",
            "warranty length?",
            "What is the duration of the limited warranty on Quorlan products?",
            "My kettle is a bit over two years old and the base failed. Is it still under warranty?",
            "kettle warranty",
            "For how many months are your kettles covered?",
        ],
    ),
    (  # f06 Ember price
        "The Quorlan Ember kettle costs $134.90.",
        ["$134.90"],
        [
            "How much does the Quorlan Ember kettle cost?",
            "price of the ember?",
            "Could you tell me the retail price of the Ember model?",
            "I'm thinking of buying the Ember as a gift. What will it set me back?",
            "Ember price",
            "What do you charge for the standard Ember kettle?",
        ],
    ),
    (  # f07 Ember Mini price
        "The Ember Mini costs $89.30.",
        ["$89.30"],
        [
            "How much is the Ember Mini?",
            "ember mini cost?",
            "What is the current price of the Quorlan Ember Mini?",
            "I live alone and only need a small kettle. How much is the Mini version?",
            "Ember Mini price",
            "What's the price tag on your compact Ember Mini?",
        ],
    ),
    (  # f08 Halo price
        "The Quorlan Halo gooseneck kettle costs $171.25.",
        ["$171.25"],
        [
            "How much does the Halo gooseneck kettle cost?",
            "halo price?",
            "Please advise the retail price of the Quorlan Halo.",
            "I make pour-over coffee and want your gooseneck model. How much is it?",
            "Halo gooseneck cost",
            "What's the price of the Halo?",
        ],
    ),
    (  # f09 FilterDrop subscription price
        "FilterDrop costs $6.35 per month and ships two fresh filters every 8 weeks.",
        ["$6.35"],
        [
            "How much is the FilterDrop subscription?",
            "filterdrop monthly price?",
            "What is the monthly fee for the FilterDrop filter subscription plan?",
            "I keep forgetting to buy new filters. What does the subscription that sends them cost?",
            "FilterDrop cost",
            "How much do you charge per month for FilterDrop?",
        ],
    ),
    (  # f10 standard shipping time
        "Standard shipping takes 6 to 8 business days.",
        ["6 to 8"],
        [
            "How long does standard shipping take?",
            "how fast is regular shipping?",
            "What is the expected delivery time for orders sent with standard shipping?",
            "I ordered a kettle yesterday with the normal shipping option. When should it arrive?",
            "standard shipping time",
            "How many days until my order arrives with standard delivery?",
        ],
    ),
    (  # f11 express shipping
        "Express shipping costs $13.75 and arrives in 2 business days.",
        ["$13.75"],
        [
            "How much does express shipping cost?",
            "price for express delivery?",
            "What is the charge for expedited shipping on an order?",
            "I need a kettle quickly for a housewarming. What does express shipping cost?",
            "express shipping fee",
            "How much extra is it to get my order sent express?",
        ],
    ),
    (  # f12 free shipping threshold
        "Shipping is free on orders over $185.",
        ["$185"],
        [
            "Do you offer free shipping?",
            "whats the minimum for free shipping",
            "Above what order value is shipping provided free of charge?",
            "My cart is at $150. How much do I need to spend to get free shipping?",
            "free shipping threshold",
            "How much do I need to spend to qualify for free delivery?",
        ],
    ),
    (  # f13 headquarters
        "Our headquarters is at 14 Larkspur Ferry Lane, Duluth, Minnesota.",
        ["Larkspur Ferry Lane", "Duluth"],
        [
            "Where are your headquarters?",
            "where are you guys based?",
            "Could you provide the address of your company headquarters?",
            "I'd like to send a letter to your head office. What's the address?",
            "HQ address",
            "In which city is Quorlan Kettleworks located?",
        ],
    ),
    (  # f14 founding year
        "Quorlan Kettleworks was founded in 1998.",
        ["1998"],
        [
            "When was Quorlan Kettleworks founded?",
            "how old is your company?",
            "In what year was the company established?",
            "My grandmother says she had a Quorlan kettle long ago. When did your company begin?",
            "founding year",
            "What year did Quorlan get started?",
        ],
    ),
    (  # f15 loyalty program name
        "Our loyalty program is called Copper Circle, and joining is free.",
        ["Copper Circle"],
        [
            "What is your loyalty program called?",
            "do you have a rewards program?",
            "What is the name of the Quorlan customer loyalty scheme?",
            "I buy a lot of your filters. Is there a rewards club I can join?",
            "loyalty program name",
            "What's the name of your points program?",
        ],
    ),
    (  # f16 loyalty points rate
        "Loyalty members earn 7 points for every dollar spent.",
        ["7 points"],
        [
            "How many loyalty points do I earn per dollar?",
            "how many points do i get when i buy stuff?",
            "At what rate are loyalty points earned on purchases?",
            "I'm about to buy a Halo. How many rewards points will each dollar earn me?",
            "points per dollar",
            "What's the earning rate for loyalty points?",
        ],
    ),
    (  # f17 points redemption
        "Every 450 points can be redeemed for $5 off your next order.",
        ["450 points"],
        [
            "How do I redeem my loyalty points?",
            "how many points for a discount?",
            "What is the conversion rate when redeeming loyalty points?",
            "I've collected a bunch of rewards points. How many do I need before I can use them?",
            "points redemption",
            "How much are my points worth at checkout?",
        ],
    ),
    (  # f18 factory reset
        "Hold the dial and the lid button together for 9 seconds until the ring glows violet.",
        ["9 seconds"],
        [
            "How do I factory reset my kettle?",
            "how to reset the kettle",
            "Please explain the procedure for restoring the kettle to factory settings.",
            "My kettle is acting strangely after I changed the settings. How can I wipe it back to default?",
            "factory reset",
            "What buttons do I hold to reset the kettle?",
        ],
    ),
    (  # f19 app name
        "Our companion app is called SteamLedger, available for iOS and Android.",
        ["SteamLedger"],
        [
            "What's the name of your app?",
            "which app do i need for the kettle?",
            "What is the name of the companion application for Quorlan kettles?",
            "I just unboxed my Ember and want to control it from my phone. What app should I download?",
            "kettle app",
            "Is there a phone app for your kettles, and what is it called?",
        ],
    ),
    (  # f20 firmware update
        "In the app, open Settings > Kettle Care > Firmware, tap Update, and keep the kettle on its base for 4 "
        "minutes.",
        ["Kettle Care", "4 minutes"],
        [
            "How do I update the kettle's firmware?",
            "how to update firmware?",
            "What is the procedure for installing a firmware update on my kettle?",
            "The app says my kettle software is out of date. How do I update it?",
            "firmware update",
            "Where do I go in the app to install new firmware?",
        ],
    ),
    (  # f21 pairing
        "Press the lid button 3 times quickly, then tap Add Kettle in the app.",
        ["3 times", "Add Kettle"],
        [
            "How do I pair my kettle with my phone?",
            "how to connect kettle to app",
            "What steps are required to pair the kettle with the mobile application?",
            "I downloaded the app but it can't find my kettle. How do I get them connected?",
            "pairing",
            "What's the button sequence for Bluetooth pairing?",
        ],
    ),
    (  # f22 lid gasket price
        "A replacement lid gasket costs $4.85.",
        ["$4.85"],
        [
            "How much is a replacement lid gasket?",
            "lid seal price?",
            "What does a spare lid gasket cost?",
            "The rubber seal on my kettle lid is cracked. How much is a new one?",
            "lid gasket price",
            "Do you sell lid gaskets, and for how much?",
        ],
    ),
    (  # f23 power base price
        "A replacement power base costs $27.60.",
        ["$27.60"],
        [
            "How much does a replacement power base cost?",
            "price for a new base?",
            "What is the price of a spare power base?",
            "My dog chewed the cord on my kettle's base. How much is a replacement?",
            "power base price",
            "Can I buy just the base, and what does it cost?",
        ],
    ),
    (  # f24 limescale filter price
        "A pack of two limescale filters costs $9.15.",
        ["$9.15"],
        [
            "How much are replacement limescale filters?",
            "spout filter price?",
            "What is the cost of spare limescale filters?",
            "The filter in my spout is clogged. How much does a new one cost?",
            "limescale filter price",
            "How much do you charge for a pack of filters?",
        ],
    ),
    (  # f25 payment methods
        "We accept Visa, Mastercard, PayPal and Klarna, but not American Express.",
        ["Klarna", "not American Express"],
        [
            "What payment methods do you accept?",
            "can i pay with amex?",
            "Which forms of payment are accepted at checkout?",
            "I want to split my kettle purchase into installments. Which payment options do you take?",
            "payment methods",
            "Do you take PayPal or credit cards?",
        ],
    ),
    (  # f26 student discount
        "Students get 13% off with a verified student email address.",
        ["13%"],
        [
            "Do you offer a student discount?",
            "any discount for students?",
            "What percentage discount is available to students?",
            "I'm at university and on a tight budget. Is there any deal for students?",
            "student discount percentage",
            "How much off do students get?",
        ],
    ),
    (  # f27 trade-in credit
        "Trade in any old electric kettle for $22 credit toward a new Quorlan kettle.",
        ["$22 credit"],
        [
            "How much credit do I get for trading in an old kettle?",
            "trade-in value?",
            "What credit is offered under your kettle trade-in program?",
            "I have an old electric kettle from another brand. Can I trade it in, and for how much?",
            "trade-in credit",
            "What's my old kettle worth toward a new Quorlan?",
        ],
    ),
    (  # f28 gift wrap
        "Gift wrapping is available at checkout for $3.40 per item.",
        ["$3.40"],
        [
            "Do you offer gift wrapping?",
            "how much for gift wrap?",
            "Is gift wrapping available, and what is the charge?",
            "The kettle is a birthday present for my sister. Can you wrap it?",
            "gift wrap price",
            "What does it cost to have my order gift wrapped?",
        ],
    ),
    (  # f29 shipping countries
        "We ship only to the United States, Canada and Iceland.",
        ["Iceland"],
        [
            "Which countries do you ship to?",
            "do you ship to the uk?",
            "To which countries are international deliveries available?",
            "I'm moving abroad next month. Will you still be able to ship to me?",
            "shipping countries",
            "Do you deliver outside the United States?",
        ],
    ),
    (  # f30 Ember capacity
        "The Ember holds up to 1.35 liters.",
        ["1.35 liters"],
        [
            "How much water does the Ember hold?",
            "ember capacity?",
            "What is the maximum capacity of the Ember kettle?",
            "I usually make tea for four people. How big is the Ember?",
            "Ember size in liters",
            "How many liters can I fill the Ember with?",
        ],
    ),
    (  # f31 temperature presets
        "The Ember has 11 presets, from 104°F to 212°F.",
        ["11 presets"],
        [
            "How many temperature presets does the Ember have?",
            "how many temp settings?",
            "What is the number of preset temperatures available on the Ember?",
            "I brew green tea and coffee. How many preset temperatures can I choose from?",
            "temperature presets",
            "What temperature range do the Ember presets cover?",
        ],
    ),
    (  # f32 keep-warm duration
        "Keep-warm holds your chosen temperature for up to 73 minutes.",
        ["73 minutes"],
        [
            "How long does keep-warm last?",
            "keep warm time?",
            "For what duration will the kettle maintain the selected temperature?",
            "I often forget my tea after boiling. How long will the kettle keep the water hot?",
            "keep-warm duration",
            "What's the maximum keep-warm time?",
        ],
    ),
    (  # f33 descaling interval
        "Descale every 38 days using one sachet of Quorlan Descaler.",
        ["38 days"],
        [
            "How often should I descale my kettle?",
            "descaling frequency?",
            "What is the recommended interval between descaling cycles?",
            "There's white buildup in my kettle. How often am I supposed to clean it out?",
            "descale interval",
            "How many days between descaling?",
        ],
    ),
    (  # f34 descaler price
        "Quorlan Descaler costs $7.95 for a box of 6 sachets.",
        ["$7.95"],
        [
            "How much does Quorlan Descaler cost?",
            "descaler price?",
            "What is the price of a box of your descaling sachets?",
            "I ran out of descaler sachets. How much is a new box?",
            "descaler cost",
            "What do you charge for descaler?",
        ],
    ),
    (  # f35 error E7
        "E7 means the kettle was switched on empty; let it cool for 19 minutes, then refill it.",
        ["switched on empty", "19 minutes"],
        [
            "What does error E7 mean?",
            "kettle showing E7",
            "Could you explain error code E7 and how to resolve it?",
            "My kettle beeped and now the display says E7. What should I do?",
            "E7 error",
            "How do I fix an E7 code?",
        ],
    ),
    (  # f36 cancellation window
        "Orders can be cancelled within 5 hours of purchase.",
        ["5 hours"],
        [
            "How long do I have to cancel an order?",
            "can i cancel my order?",
            "Within what time frame may an order be cancelled after purchase?",
            "I ordered the wrong color this morning. Is it too late to cancel?",
            "cancellation window",
            "How soon after ordering must I cancel?",
        ],
    ),
    (  # f37 refund processing time
        "Refunds arrive within 11 business days after we receive your return.",
        ["11 business days"],
        [
            "How long do refunds take?",
            "when will i get my money back?",
            "What is the processing time for refunds once a return has been received?",
            "I sent my kettle back last week. When will the refund show up?",
            "refund time",
            "How many business days does a refund take?",
        ],
    ),
    (  # f38 return shipping cost
        "Return shipping is a flat $8.20, deducted from your refund.",
        ["$8.20"],
        [
            "Do I have to pay for return shipping?",
            "return shipping cost?",
            "What is the charge for return postage?",
            "I'm sending back a kettle I didn't like. Will the return label cost me anything?",
            "return shipping fee",
            "How much is deducted from my refund for return shipping?",
        ],
    ),
    (  # f39 founder
        "Quorlan Kettleworks was founded by Idris Penhallow.",
        ["Idris Penhallow"],
        [
            "Who founded Quorlan Kettleworks?",
            "who started the company?",
            "Could you tell me the name of the company's founder?",
            "I'm writing a school report about your brand. Who was the person who started it?",
            "founder name",
            "Who is behind Quorlan?",
        ],
    ),
    (  # f40 extended warranty
        "The Steady Pour Plan adds 24 months of coverage for $19.60.",
        ["24 months", "$19.60"],
        [
            "Do you offer an extended warranty?",
            "extended warranty price?",
            "What does the optional extended protection plan cost?",
            "My warranty is about to run out. Can I buy more coverage?",
            "Steady Pour Plan",
            "How much is extra warranty coverage?",
        ],
    ),
]

OUT_PATH = Path(__file__).resolve().parent.parent / "src" / "afina" / "recipes" / "data" / "quickstart_support.jsonl"


def build_rows() -> list[dict]:
    assert len(FACTS) == 40, len(FACTS)
    answers = [a for a, _, _ in FACTS]
    assert len(set(answers)) == len(answers), "duplicate answers"

    seen_keys: dict[str, str] = {}
    seen_questions: set[str] = set()
    rows: list[dict] = []
    for i, (answer, keys, questions) in enumerate(FACTS, start=1):
        group = f"f{i:02d}"
        assert len(answer.split()) <= 30, (group, answer)
        assert 1 <= len(keys) <= 2, (group, keys)
        assert len(questions) == 6, (group, len(questions))
        for key in keys:
            assert key in answer, (group, key)
            assert key not in seen_keys, (group, key, seen_keys.get(key))
            seen_keys[key] = group
            # keep facts separable: a key never shows up in another fact's answer
            for j, other in enumerate(answers, start=1):
                if j != i:
                    assert key not in other, (group, key, f"f{j:02d}")
        for q_idx, question in enumerate(questions, start=1):
            norm = question.strip().lower()
            assert norm not in seen_questions, (group, question)
            seen_questions.add(norm)
            rows.append(
                {
                    "id": f"{group}-q{q_idx}",
                    "group": group,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "must_include": list(keys),
                }
            )
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) == 240, len(ids)
    return rows


def main() -> None:
    rows = build_rows()
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    with OUT_PATH.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT_PATH}")


if __name__ == "__main__":
    main()
