"""A held-out set for embedding quality: 72 sentences, none of them in the build's validation
set (edgepack.build.onnx_validate.SENTENCES), written for this project. Groups: short, long,
non-English, code, numbers, and everyday questions and statements."""

from __future__ import annotations

SHORT = (
    "Yes.", "No way!", "Hi there", "ok", "Thanks a lot.", "Good morning", "Why?", "Sure thing",
    "Stop.", "Coffee, please.", "Well done!", "See you soon",
)
LONG = (
    " ".join(["The committee reviewed the annual budget line by line, questioning every "
              "expense that had grown faster than inflation."] * 6),
    " ".join(["Rain fell steadily over the valley while the farmers waited for the river "
              "to crest, sandbags stacked along the low road."] * 8),
    "In the spring of that year the small bakery on the corner began opening an hour earlier, "
    "because the new train schedule brought commuters through the square before dawn, and the "
    "owner, who had run the shop for thirty years, decided that warm bread at six was worth "
    "the lost sleep; within a month the queue stretched past the pharmacy.",
    " ".join(f"Step {i}: tighten bolt {i} to the specified torque." for i in range(1, 40)),
    " ".join(["lorem ipsum dolor sit amet"] * 60),
    "A detailed account of the expedition, including the route over the pass, the supplies "
    "carried by each member, the weather on every day of the crossing, and the names of the "
    "villages where they stopped, was published two years later in a thin grey volume.",
)
NON_ENGLISH = (
    "Le chat dort sur le canapé depuis ce matin.",
    "¿Dónde está la estación de tren más cercana?",
    "Die Besprechung wurde auf nächsten Dienstag verschoben.",
    "Il treno per Milano parte alle otto e un quarto.",
    "Ik heb gisteren een nieuwe fiets gekocht.",
    "Kolme kissaa istui aidalla auringossa.",
    "Она читает книгу в парке каждый вечер.",
    "我明天要去图书馆借几本书。",
    "今日はとても暑いので、水をたくさん飲んでください。",
    "오늘 저녁에 친구들과 영화를 볼 거예요.",
    "الطقس جميل اليوم في المدينة.",
    "Bugün hava çok güzel, parka gidelim.",
    "Hôm nay trời đẹp quá.",
    "Ο καιρός σήμερα είναι υπέροχος.",
)
CODE = (
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
    "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
    "git rebase --onto main feature~3 feature",
    "const add = (a, b) => a + b; export default add;",
    "<div class=\"header\"><a href=\"/home\">Home</a></div>",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{:?}\", v); }",
    "curl -s -X POST -H 'Content-Type: application/json' localhost:8080/v1/embeddings",
    "{\"id\": 17, \"tags\": [\"a\", \"b\"], \"active\": true}",
    "docker run --rm -p 8080:8080 -v $(pwd):/data image:latest",
)
NUMBERS = (
    "3.14159 26535 89793 23846",
    "The invoice total is $1,249.99 due on 2024-03-15.",
    "Call 555-0199 or +44 20 7946 0958.",
    "42",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Temperature dropped from 21.5°C to -3.2°C overnight.",
    "Version 2.10.3 fixes 17 bugs and adds 4 features.",
    "0x1F 0xFF 0b1010 1e-9 6.022e23",
    "Room 404, floor 12, building B7.",
    "Q3 revenue grew 12.4% year over year to 8.7 billion.",
)
EVERYDAY = (
    "How long should I boil an egg for a soft yolk?",
    "My laptop battery drains quickly when the screen is bright.",
    "The museum is closed on Mondays and public holidays.",
    "Can you recommend a good book about the history of mathematics?",
    "She planted tomatoes, basil and peppers in the back garden.",
    "The flight was delayed by two hours because of fog.",
    "Please remember to water the plants while I am away.",
    "What time does the pharmacy open on Sunday?",
    "The new update improved the app's startup time.",
    "He practises the violin for an hour every evening.",
    "Our team won the match in the last minute.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Which bus goes to the airport from the city centre?",
    "The sensor reports humidity every thirty seconds.",
    "I forgot my umbrella at the office again.",
    "Solar panels produce less power in winter.",
    "The children built a sandcastle near the pier.",
    "Backups run every night at two o'clock.",
    "The hotel room had a view of the harbour.",
    "Turn left after the bakery and continue straight.",
)
HELDOUT = SHORT + LONG + NON_ENGLISH + CODE + NUMBERS + EVERYDAY
