"""Default prompt templates of the SDG stages, in the project's own words.

Every template is a `str.format` string; override any by name from the pipeline YAML
(`templates: {open_qa: "..."}`) or per call. Generator templates ask for numbered lists, which
`nemojax.sdg.listparse` turns into items (rejecting any item the model did not actually write).
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    # --- prompt generation (macro topics -> subtopics -> prompts)
    "macro_topics": "List {n} broad and varied topics that people talk to an AI assistant about. "
                    "Answer with a numbered list of short topic names and nothing else.",
    "subtopics": "List {n} specific subtopics of the topic \"{topic}\". Answer with a numbered list of short "
                 "subtopic names and nothing else.",
    "open_qa": "Write {n} questions that someone curious about \"{topic}\" might ask an assistant. Answer with a "
               "numbered list of questions and nothing else.",
    "writing": "Write {n} requests asking an assistant to write a {material} about \"{topic}\". Answer with a "
               "numbered list of requests and nothing else.",
    "closed_qa": "Read the document below and write {n} questions that can be answered from the document alone. "
                 "Answer with a numbered list of questions and nothing else.\n\nDocument:\n{document}",
    "closed_qa_prompt": "{document}\n\n{question}",
    "math": "Write {n} math problems about \"{topic}\" for {level} students. Answer with a numbered list of "
            "problems and nothing else.",
    "python": "Write {n} {level} Python programming problems about \"{topic}\". Answer with a numbered list of "
              "problems and nothing else.",
    "revise": "Rewrite the request below so it is more specific and detailed while asking for the same thing. "
              "Reply with the rewritten request only.\n\nRequest: {prompt}",
    "list_to_yaml": "Copy the items of the list in the text below into a YAML list of strings, each item word for "
                    "word. Reply with the YAML list only.\n\nText:\n{text}",
    # --- dialogues (the model plays the user)
    "user_turn": "You are playing the part of a person chatting with an AI assistant. About you: {persona}\n\n"
                 "The conversation so far:\n{conversation}\n\nWrite your next message to the assistant: a natural "
                 "follow-up. Reply with the message only.",
    # --- judges
    "judge_pair": "Two assistant responses to the same request follow. Decide which one is more helpful, correct "
                  "and clear.\n\nRequest:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
                  "Reply with one letter, A or B, and nothing else.",
    # --- Genetic Instruct
    "genetic_mutate": "Here is a programming problem:\n\n{problem}\n\nWrite a new problem from it that is {direction}. "
                      "Reply with the new problem statement only.",
    "genetic_crossover": "Here are some programming problems:\n\n{examples}\n\nWrite one new programming problem in "
                         "the same style that differs from all of them. Reply with the problem statement only.",
    "genetic_code": "Solve the programming problem below in Python. Reply with one ```python code block that "
                    "defines the solution and then checks it with a few assert statements.\n\nProblem:\n{problem}",
    "genetic_judge": "Rate how correct and well written this solution is for the problem, from 1 (useless) to 10 "
                     "(perfect).\n\nProblem:\n{problem}\n\nSolution:\n{solution}\n\nReply with the number only.",
}

MUTATIONS = ("harder, with one more requirement or constraint",
             "about a different situation that needs a different algorithm",
             "more precise about its inputs, outputs and edge cases")


def render(name: str, overrides: dict[str, str] | None = None, **fields: object) -> str:
    template = (overrides or {}).get(name) or TEMPLATES[name]
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        raise ValueError(f"template {name!r} uses a field it is not given ({e}); available: "
                         f"{', '.join(sorted(fields))}") from None
