"""A text-only dialogue (the notebook's beaver conversation): text in, text and retrieved images out. A
ret_scale_factor above 1 makes FROMAGe more likely to answer with an image."""
import common

NOTEBOOK_PROMPTS = [
    "I am thinking of an animal. It is brown and furry, and has a tail. What is it?",
    "No, the animal I am thinking of lives in the river.",
    "That's right, what do beavers look like?",
    "Show me an illustration of a beaver",
    "Yes, what about a pencil drawing of one?",
    "What about a photo of one?",
]
# The miniworld has no animals: the same guessing game about one of its shapes.
MINIWORLD_PROMPTS = [
    "I am thinking of a shape. It is red and round. What is it?",
    "No, the shape I am thinking of has a hole in the middle.",
    "That's right, what does a red ring look like?",
    "Show me a picture of a red ring",
    "Yes, what about a drawing of one?",
    "What about a large one?",
]


def main() -> int:
    example = common.load(common.parse_args(__doc__, image=False), NOTEBOOK_PROMPTS, MINIWORLD_PROMPTS)
    common.dialogue(example, ret_scale_factor=1.3, max_num_rets=1)
    return 0


if __name__ == "__main__":
    common.run(main)
